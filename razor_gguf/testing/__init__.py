"""Test helpers: tiny synthetic GGUF models and a numpy forward pass that matches llama.cpp's math.

Needs only numpy and gguf (no native libraries), so it can be imported before or without llama_cpp.
"""
