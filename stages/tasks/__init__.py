"""Tasks with answers a program can check: the verifiable rewards of reasoning RL."""
