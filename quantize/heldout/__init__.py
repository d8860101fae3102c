"""Held-out fidelity suite: hand-written prose and chat, camera-like photos, documents, multi-image prompts."""
