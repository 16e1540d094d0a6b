"""The demos: the synthetic world end to end (`synthetic`) and ISARA on a real checkpoint (`real`)."""
