"""The DeepSeekModel operator: the API, the renderers of its children, the kopf handlers and the operator CLI."""
