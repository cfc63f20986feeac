"""HTTP routes, one blueprint per group of the Tinker API. Each route parses, hands off, answers."""
