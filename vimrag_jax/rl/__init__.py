"""Policy-gradient objectives: GGPO masks on top of GSPO / GSPO-token / GRPO."""
