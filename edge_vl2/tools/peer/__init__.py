"""llama.cpp as a peer: our decoder written as a GGUF, quantized and run by llama.cpp for side-by-side figures."""
