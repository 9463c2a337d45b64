"""Pure data and rules: dataclasses, estimators, warning rules, routing. No I/O, no threads."""
