"""Reference solutions: same names and signatures as exercises/. Peek only when stuck."""
