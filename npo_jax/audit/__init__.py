"""`npo-jax audit`: leak probes that ask whether an unlearned model still knows the forget facts.

The TOFU metrics score likelihoods and ROUGE of whole answers; an auditor wants to know whether
the *facts* come back under other prompts. Every probe here is defined in docs/audit.md, scores
the novel key facts of each answer (`facts`), and is reported with its items and a bootstrap CI.
"""
