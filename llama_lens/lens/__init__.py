"""Read-outs of the residual stream: the logit lens, the tuned lens and its trainer, direct logit
attribution, and `test_prompt`.
"""
