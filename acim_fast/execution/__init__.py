"""Tool-integrated execution: prompt and cell formats, the model as rollouts see it, the code sandbox (client and
server), and the rollout loop that stops at a cell, runs it and appends its output."""
