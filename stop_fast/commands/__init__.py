"""One module per `stop-fast` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``.

Modules here import only the standard library at module level (``--help`` must be instant); the
library is imported inside ``run``.
"""
