/* LD_PRELOAD'ed into the master by instructions.sh: a worker is started by exec of
 * /proc/self/fd/N (the master's own binary), which valgrind cannot follow (the descriptor is
 * close-on-exec, gone by the time valgrind's launcher opens it). This runs that exec through
 * valgrind's callgrind instead, with the binary's real path, and the master itself natively. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

int execvp(const char *file, char *const argv[]) {
    int (*real)(const char *, char *const[]) = dlsym(RTLD_NEXT, "execvp");
    const char *out = getenv("CALLGRIND_DIR");
    char path[4096];
    ssize_t n;
    if (!out || strncmp(file, "/proc/self/fd/", 14) != 0 ||
        (n = readlink(file, path, sizeof path - 1)) <= 0)
        return real(file, argv);
    path[n] = 0;
    char outarg[4200];
    snprintf(outarg, sizeof outarg, "--callgrind-out-file=%s/callgrind.%%p", out);
    int argc = 0;
    while (argv[argc]) argc++;
    char **nv = calloc(argc + 4, sizeof(char *));
    if (!nv) return real(file, argv);
    int k = 0;
    nv[k++] = "valgrind";
    nv[k++] = "--tool=callgrind";
    nv[k++] = outarg;
    nv[k++] = path;
    for (int i = 1; i < argc; i++) nv[k++] = argv[i];
    nv[k] = 0;
    unsetenv("LD_PRELOAD");
    return execve("/usr/bin/valgrind", nv, environ);
}
