"""`finetune data prepare RECIPE`: encode a recipe's data into the prepared-data cache and say
what it holds, without loading a model. Run it on a CPU box (or once before `accelerate launch`);
the training run with the same data, tokenizer and settings then starts from the cache.
Point FINETUNE_CACHE at the same (shared) dir on both sides."""

from __future__ import annotations

from finetune.errors import OutputError, RecipeError


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def prepare(recipe) -> str:
    """Prepare the recipe's train (and eval) data; return the report printed by the CLI."""
    from finetune import data, loading
    from finetune.data import cache

    if recipe.stage not in ("sft", "distill"):  # distill's data is sft's
        raise RecipeError(
            f"{recipe.source or 'recipe'}: stage {recipe.stage}: its data is tokenized by the TRL "
            "trainer while it starts; `data prepare` is for sft and distill recipes"
        )
    if recipe.data.streaming:
        raise RecipeError(
            f"{recipe.source or 'recipe'}: data.streaming: streamed data is encoded while training; "
            "there is nothing to prepare (unset data.streaming to cache it)"
        )
    if recipe.data.cache == "off":
        raise RecipeError(f"{recipe.source or 'recipe'}: data.cache: off keeps nothing; use auto or refresh")
    if not cache.writable():
        raise OutputError(
            f"data cache: {cache.root()} is not writable, so nothing can be prepared there; set "
            "FINETUNE_DATA_CACHE to a writable dir (a run finds an intact entry in a read-only one)"
        )
    tok = loading.load_tokenizer_or_processor(recipe.model, recipe.data)  # a processor for a vision-language model
    prepared = data.load_recipe(recipe, tok)  # what train loads: the same cache key
    lines = [f"prepared data for {recipe.source or 'recipe'} (cache root {cache.root()})"]
    seen = set()
    for name, split in (("train", prepared.train), ("eval", prepared.eval)):
        if split is None:
            continue
        s = split.stats()
        lines.append(
            f"  {name:<6} {split.source}: {s['examples']:,} examples from {s['records']:,} records, "
            f"{s['tokens']:,} tokens ({s['trained_tokens']:,} trained), length p50 {s['length_p50']} "
            f"max {s['length_max']}; {s['truncated']} truncated, {s['dropped']} dropped"
        )
        if split.cache_dir not in seen:
            seen.add(split.cache_dir)
            meta = cache.read_meta(split.cache_dir)
            lines.append(
                f"         cache {split.cache_dir} ({_size(cache.size_on_disk(split.cache_dir))}, "
                f"format {meta['format']}, max_length {meta['max_length']}, built {meta['created']} "
                f"in {meta['seconds']} s at {meta['encode_rows_per_s']:,.0f} records/s)"
            )
    lines += [f"  note   {n}" for n in prepared.notes]
    return "\n".join(lines)
