"""Everything that runs or aggregates many training runs: the sweep launcher (`sweep`), the
results table and plots (`results`, with the published numbers in `published`), and the
post-hoc conversion study (`conversion`)."""
