"""The ``gptflow`` command line: one entry point over the gpt/ stages, the flows and the runtime."""
