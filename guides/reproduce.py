""".. include:: reproduce.md"""
