"""The optional C part of millpond: the traced task path (`millpond._spancore`).

`optional=True`: where no C compiler (or no Python headers) is found the build goes on without it,
and millpond runs the same code in pure Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "millpond._spancore",
            ["src/millpond/_spancore.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
