"""Real datasets shipped inside installed packages (no downloads at run time)."""
