"""kvbm-trtllm."""
