"""Order model, trading rules, the matching engine and the pure-Python reference book."""
