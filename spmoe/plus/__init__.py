"""spmoe_plus's parts beyond SP-MoE: memory-aware draft precision, CPU-assisted experts, adaptive draft length."""
