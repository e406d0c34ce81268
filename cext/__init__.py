"""The Cython order book: C-level price levels, FIFO queues, order index and matching loop."""
