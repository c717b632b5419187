"""FlashAttention's kernels (FA3 on Hopper, FA2 on Ampere and Ada) through dew-flash-attn."""
