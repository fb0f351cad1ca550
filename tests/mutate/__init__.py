"""`make mutate`: the mutation-testing runner and its list of equivalent mutants."""
