def split_quoted(line, separator=","):
    """Split `line` at `separator`s outside double quotes; quotes are removed and "" is a literal quote."""
    fields, field, quoted, i = [], [], False, 0
    while i < len(line):
        char = line[i]
        if char == '"':
            if quoted and line[i + 1:i + 2] == '"':
                field.append('"')
                i += 1
            else:
                quoted = not quoted
        elif char == separator and not quoted:
            fields.append("".join(field))
            field = []
        else:
            field.append(char)
        i += 1
    fields.append("".join(field))
    return fields
