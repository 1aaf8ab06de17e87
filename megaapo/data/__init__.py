"""Data: the row schema, readers and converters, prompt building, and the synthetic generator."""

from megaapo.data.dataset import load_examples, read_records
from megaapo.data.prompts import Prompt, PromptBuilder, format_target
from megaapo.data.schema import SKIP_REASONS, DataError, Example, RowError, SkipReport

__all__ = ["SKIP_REASONS", "DataError", "Example", "Prompt", "PromptBuilder", "RowError", "SkipReport",
           "format_target", "load_examples", "read_records"]
