"""`cost-dist data ...` subcommands (placeholder until the data layer lands)."""


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare datasets and print statistics")
    p.add_subparsers(dest="data_command", required=True)
