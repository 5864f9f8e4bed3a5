/*
 * cli.h - interactive command line on the console UART.
 */
#ifndef CLI_H
#define CLI_H

#include <stdbool.h>
#include <stddef.h>

typedef int (*cli_handler_t)(int argc, char **argv);

typedef struct {
    const char   *name;
    const char   *usage;
    const char   *help;
    cli_handler_t handler;
    unsigned char min_args;    /* not counting the command name */
} cli_command_t;

#define CLI_OK          0
#define CLI_ERR_USAGE   1
#define CLI_ERR_ARG     2
#define CLI_ERR_FAIL    3

void   cli_init(const char *prompt);
/* Consumes pending UART input; executes a command on end of line. */
void   cli_poll(void);
/* Tokenises and runs one line (modifies it in place). */
int    cli_execute(char *line);
/* Splits a line into arguments, honouring double quotes and backslashes. */
int    cli_tokenize(char *line, char **argv, int max_args);
size_t cli_command_count(void);
const cli_command_t *cli_command_at(size_t index);
void   cli_print_prompt(void);

#endif /* CLI_H */
