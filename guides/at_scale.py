""".. include:: at_scale.md"""
