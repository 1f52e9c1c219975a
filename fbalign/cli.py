"""The ``fbalign`` command line."""

from fbalign._src.cli import build_parser, main
from fbalign._src.rule_args import parse_rule_args, parse_rule_value, rule_options

__all__ = ["build_parser", "main", "parse_rule_args", "parse_rule_value", "rule_options"]
