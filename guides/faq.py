""".. include:: faq.md"""
