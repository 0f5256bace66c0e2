"""``python -m lingshu_rl.launch``: config -> Ray -> warm-up SFT -> GRPO."""
