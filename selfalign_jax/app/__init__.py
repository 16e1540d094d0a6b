"""The ISARA application over the core: run settings, seed and evaluation data, the loop's steps and filters,
retrieval, run directories, evaluation scorers, reports and the synthetic world of the demo."""
