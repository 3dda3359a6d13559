"""The worker process of cydispatch: the worker, its HTTP protocol and the apps it serves.

The primary, the command line and everything else of the product live in the
`cydispatch` package; this one is what runs inside each worker.
"""
