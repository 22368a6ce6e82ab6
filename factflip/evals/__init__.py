"""Evals: what a model answers and how likely it finds it — the one teacher-forced scorer
(`loglik`), generation requests, QA, multiple choice, RWKU and CounterFact metrics."""
