from pipelines.allocator import return_freed_memory

return_freed_memory()
