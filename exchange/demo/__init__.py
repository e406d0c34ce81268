"""The launch scenario shipped with carbonx for `carbonx demo` and the tests."""
