"""Talking to chat models: prompt building and the fast streaming reader."""
