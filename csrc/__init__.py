"""C++ sources for the CPU grouped-LoRA op (compiled on first use by lumoe_engine.ops.cpp)."""
