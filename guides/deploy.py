""".. include:: deploy.md"""
