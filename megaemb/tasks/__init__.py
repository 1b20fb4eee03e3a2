"""Model task types (``--task_type``): what a task supplies to the shared loop (heads, losses,
batch rules, eval and export hooks). Not nanochat-style dataset tasks."""
