"""memfit: make language models fit the memory you have, and measure it."""
