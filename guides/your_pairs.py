""".. include:: your_pairs.md"""
