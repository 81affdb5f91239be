"""Semantic cache: embed the normalised last user turn, find near entries, decide hit or miss.

The decision (``decision``) is a pure policy over neighbour lists; embedding (``embedder``) and the
ANN index (``index``) are the I/O-ish parts, and ``tune`` learns the policy's parameters from
labelled ``text,category`` data.
"""
