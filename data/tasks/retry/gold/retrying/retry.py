import functools


def retry(times, exceptions=(Exception,)):
    """Call the function up to `times` times while it raises one of `exceptions`; the last error propagates."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for attempt in range(times):
                try:
                    return fn(*args, **kwargs)
                except exceptions:
                    if attempt == times - 1:
                        raise
        return wrapper
    return decorate
