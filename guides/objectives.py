""".. include:: objectives.md"""
