"""The `lgca` command line: one module per command group over one module of shared argument groups.

Nothing here imports torch or Ray at module level: `lgca --help` stays fast, and each command imports the run or
review code it needs when it runs.
"""
