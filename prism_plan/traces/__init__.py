"""Recording and reading routing traces, and the activation tables built from them."""
