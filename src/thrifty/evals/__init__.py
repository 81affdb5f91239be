"""Golden-set evaluations: golden sets and scorers, a priced eval runner, and a regression gate."""
